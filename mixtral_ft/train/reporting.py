"""Where training metrics go: wandb (online, or offline when its server is out of reach) and tensorboard.

The recipe's `logging` section picks them; the HF Trainer's own integrations do the reporting. A run resumed
from a checkpoint logs on to the wandb run it started (`wandb_session`), not to a second one.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

# wandb names a run's folder `[offline-]run-YYYYmmdd_HHMMSS-ID`, with `-N` added when the same id starts twice in a
# second, and the run's transaction log inside `run-ID.wandb`: the id is read from the file, which is unambiguous.
RUN_FOLDER = re.compile(r"^(?:offline-)?run-(\d{8}_\d{6})-")


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


def newest_wandb_id(out: Path) -> str | None:
    """The id of the newest wandb run in OUTPUT_DIR/wandb (by its start time, then its last write); None: none."""
    found = []
    for log in Path(out, "wandb").glob("*run-*/run-*.wandb"):
        start = RUN_FOLDER.match(log.parent.name)  # not the `latest-run` link: it names no start time
        if start:
            found.append((start[1], log.stat().st_mtime, log.name.removeprefix("run-").removesuffix(".wandb")))
    return max(found)[2] if found else None


def wandb_resume_env(recipe, out: Path, resume_from: Path | None) -> dict[str, str]:
    """What to add to the environment so that wandb.init continues this output dir's wandb run ({}: a new run).

    Only when resuming from one of this output dir's own checkpoints, and only when the user has not chosen the
    id (WANDB_RUN_ID wins). A checkpoint from another output dir starts a new wandb run: this folder is another
    run, and logging both into one wandb run would interleave them. train.overwrite deletes the old wandb/ before
    this is read, so a replaced run gets a new id too. Going back to an older checkpoint here (train.resume:
    checkpoint-N) continues the same wandb run, whose charts then hold the redone steps twice.
    """
    if "wandb" not in recipe.logging.report_to or resume_from is None or "WANDB_RUN_ID" in os.environ:
        return {}
    if Path(resume_from).resolve().parent != Path(out).resolve():
        return {}
    run_id = newest_wandb_id(out)
    if run_id is None:  # the interrupted part did not report to wandb
        return {}
    # allow: resume the run if the server has it, else create it with this id. Offline, each part writes its own
    # offline-run folder with this id, and `wandb sync` uploads such folders in order of start time, as one run.
    return {"WANDB_RUN_ID": run_id, "WANDB_RESUME": "allow"}


@contextmanager
def wandb_session(recipe, out: Path, resume_from: Path | None) -> Iterator[None]:
    """Around training (wandb.init runs at its start): wandb reads this run's environment, and a resumed run logs
    to the wandb run it began.

    A WANDB_RESUME the user set is kept. The variables go again afterwards, so that a later run in this process,
    or a process it starts, gets its own. Steps stay right: transformers logs `train/global_step` with every point
    and makes it the x axis of every chart, and the resumed Trainer restores global_step from the checkpoint
    (wandb's own `_step` counts from 0 again in an offline part).
    """
    if "wandb" not in recipe.logging.report_to:
        yield
        return
    added = {k: v for k, v in wandb_resume_env(recipe, out, resume_from).items() if k not in os.environ}
    os.environ.update(added)
    fresh_wandb_session()
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def fresh_wandb_session() -> None:
    """wandb reads the environment once per process, at its first init, and later inits ignore changes to it: end
    the session an earlier run in this process left, so that wandb.init reads this run's WANDB_DIR, project, id."""
    wandb = sys.modules.get("wandb")  # not imported: no session yet
    if wandb is not None and wandb.run is None:  # a run the caller started and left open is theirs to keep
        wandb.teardown()
