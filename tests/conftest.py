import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # test helpers (markov.py)


@pytest.fixture(scope="session")
def pydoc_data(tmp_path_factory):
    """A byte-level data dir built from Python's own pydoc topics: tiny, offline, always present."""
    from fewstep.config import DataConfig
    from fewstep.data import build

    d = tmp_path_factory.mktemp("data") / "pydoc-byte"
    build(DataConfig(corpus="pydoc", tokenizer="byte", dir=str(d)))
    return d


def tiny_overrides(data_dir, out_dir, **extra) -> list[str]:
    """CLI-style overrides for a seconds-long CPU run on the pydoc data."""
    base = {
        "data.corpus": "pydoc", "data.dir": str(data_dir), "data.unique_tokens": 0, "data.epochs": 1,
        "model.seq_len": 32, "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2,
        "train.out_dir": str(out_dir), "train.batch_size": 8, "train.max_steps": 12, "train.warmup_steps": 2,
        "train.log_every": 1, "train.eval_every": 6, "train.eval_batches": 2, "train.ckpt_every": 4,
        "train.ema": 0.9,
    }
    base.update(extra)
    return [f"--{k}={v}" for k, v in base.items()]


def forbid_data_access(monkeypatch) -> None:
    """Make every way of reading training data raise: a data-free method must never trip it."""
    import fewstep.data as data
    import fewstep.data.corpus as corpus
    import fewstep.data.stream as stream

    def touched(*a, **k):
        raise AssertionError("the data loader was touched")

    for mod, attr in [(stream.TokenBlocks, "__init__"), (stream.TokenBlocks, "batch"),
                      (stream.TokenBlocks, "iter_eval"), (stream, "load_meta"), (data, "load_meta"),
                      (corpus, "ensure"), (corpus, "build")]:
        monkeypatch.setattr(mod, attr, touched)


def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 ARGS` on CPU (gloo, 1 thread per process, a free port of its own).
    Asserts it succeeded; when it did not, the message shows each rank's last stderr lines."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--tee", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    ranks = [ln for ln in res.stderr.splitlines() if ln.startswith("[default")]  # what each rank said, last
    assert res.returncode == 0, "\n".join(ranks[-20:]) + "\n" + res.stderr[-1500:]
    return res
