"""Using a result: chat in the terminal or the browser, and held-out evaluation (base vs adapter)."""
