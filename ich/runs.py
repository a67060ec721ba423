"""Run folders: where a checkpoint's run lives, and which checkpoint `ckpt_path=last` or a run folder means."""

from pathlib import Path

LAST = "last"


def training_run_dir(checkpoint: Path) -> Path:
    """train.py keeps checkpoints in <run>/checkpoints/; a checkpoint copied elsewhere is its own run folder."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def resume_checkpoint(ckpt_path: str, outputs: Path = Path("outputs")) -> Path:
    """The checkpoint to resume from: `last` (the newest run's last.ckpt), a run folder, or a .ckpt file."""
    if ckpt_path == LAST:
        candidates = sorted(outputs.glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise FileNotFoundError(
                f"ckpt_path=last found no checkpoints/last.ckpt under {outputs}/: pass the checkpoint's path instead."
            )
        return candidates[-1]
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} is not a checkpoint: pass a .ckpt file, a run folder, or last.")
    return path


def best_checkpoint(run: Path) -> Path:
    """The checkpoint a training run tested: its one best checkpoint beside last.ckpt (save_top_k=1), or
    last.ckpt when validation never saved one."""
    folder = run / "checkpoints"
    best = sorted(path for path in folder.glob("*.ckpt") if path.name != "last.ckpt")
    if len(best) == 1:
        return best[0]
    if best:
        raise ValueError(f"{folder} holds {len(best)} checkpoints besides last.ckpt: pass the one to test as ckpt_path.")
    if (folder / "last.ckpt").is_file():
        return folder / "last.ckpt"
    raise FileNotFoundError(f"{run} holds no checkpoints/*.ckpt: pass a run folder of train.py or a .ckpt file.")
