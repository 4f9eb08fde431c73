"""Where training metrics go: wandb (online, or offline when its server is out of reach) and tensorboard.

The recipe's `logging` section picks them; the HF Trainer's own integrations do the reporting.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse


def report_to(recipe) -> list[str]:
    return [r for r in recipe.logging.report_to if r != "none"] or ["none"]


def configure_reporting(recipe, output_dir: str | Path) -> None:
    """Set the environment the HF wandb and tensorboard integrations read; call before building the trainer."""
    out = Path(output_dir)
    if "wandb" in recipe.logging.report_to:
        os.environ["WANDB_PROJECT"] = recipe.logging.project
        os.environ["WANDB_DIR"] = str(out)  # runs land in OUTPUT_DIR/wandb/, next to what they describe
        if "WANDB_MODE" not in os.environ and not wandb_reachable():
            # Without a key or a network wandb.init would stop the run; offline it still writes everything,
            # for `wandb sync OUTPUT_DIR/wandb/offline-run-*` later.
            os.environ["WANDB_MODE"] = "offline"
    if "tensorboard" in recipe.logging.report_to:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tensorboard")


def wandb_reachable(timeout: float = 3.0) -> bool:
    """An API key is configured (environment or ~/.netrc) and the wandb server accepts a connection."""
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    if not os.environ.get("WANDB_API_KEY"):
        import netrc

        try:
            if netrc.netrc().authenticators(host) is None:
                return False
        except (OSError, netrc.NetrcParseError):
            return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False
