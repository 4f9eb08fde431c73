"""Memory preflight: the predicted peak GPU memory of a recipe, term by term, and advice when it does not fit."""
