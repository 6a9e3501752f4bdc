"""Fixtures for the Chatterbox engine tests: random model files in the real layout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from filelock import FileLock

torch = pytest.importorskip("torch")
# What tests/conftest.py asks for, in case torch was imported before it could say.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
pytest.importorskip("chatterbox_vllm.models.s3gen")

from .s3gen_checkpoint import write_random_s3gen_model_dir  # noqa: E402


def _run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of this test run: shared by all pytest-xdist workers, else our own."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def s3gen_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with random full-size ``s3gen.safetensors``, ``ve.safetensors`` and ``conds.pt``.

    Written once per test run (~1 GB): the first worker to need it writes it, the others wait.
    """
    run_dir = _run_dir(tmp_path_factory)
    folder = run_dir / "chatterbox-model"
    with FileLock(run_dir / "chatterbox-model.lock"):
        if not (folder / "written").exists():
            write_random_s3gen_model_dir(folder, seed=0)
            (folder / "written").touch()
    return folder


@pytest.fixture(scope="session")
def chatterbox_model_dir(s3gen_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A whole random Chatterbox model folder: S3Gen, VE, conds.pt, a 2-layer T3, tokenizer."""
    from .t3_checkpoint import write_random_t3_checkpoint

    with FileLock(_run_dir(tmp_path_factory) / "chatterbox-model.lock"):
        if not (s3gen_model_dir / "t3_cfg.safetensors").exists():
            write_random_t3_checkpoint(s3gen_model_dir, n_layers=2, seed=0)
    return s3gen_model_dir


@pytest.fixture(scope="session")
def s3gen_model(s3gen_model_dir: Path):
    """S3Gen loaded from the random checkpoint through the engine's loader."""
    from chatterbox_sidecar.engines.chatterbox.s3gen.loader import load_s3gen

    return load_s3gen(s3gen_model_dir / "s3gen.safetensors", "cpu")


@pytest.fixture(scope="session")
def voice_encoder(s3gen_model_dir: Path):
    """The voice encoder loaded from the random checkpoint."""
    from chatterbox_sidecar.engines.chatterbox.s3gen.loader import load_voice_encoder

    return load_voice_encoder(s3gen_model_dir / "ve.safetensors", "cpu")


@pytest.fixture(scope="session")
def meanflow_model_dir(s3gen_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``s3gen_model_dir`` plus ``s3gen_meanflow.safetensors`` (Turbo's S3Gen, ~1 GB)."""
    from .turbo_checkpoint import write_meanflow_s3gen

    with FileLock(_run_dir(tmp_path_factory) / "chatterbox-model.lock"):
        if not (s3gen_model_dir / "s3gen_meanflow.safetensors").exists():
            tmp = s3gen_model_dir / "meanflow-tmp"
            tmp.mkdir(exist_ok=True)
            path = write_meanflow_s3gen(tmp, s3gen_model_dir / "s3gen.safetensors")
            path.rename(s3gen_model_dir / path.name)
    return s3gen_model_dir


@pytest.fixture(scope="session")
def meanflow_model(meanflow_model_dir: Path):
    """Turbo's meanflow S3Gen loaded through the engine's loader."""
    from chatterbox_sidecar.engines.chatterbox.turbo.s3gen import load_meanflow_s3gen

    return load_meanflow_s3gen(meanflow_model_dir / "s3gen_meanflow.safetensors", "cpu")


# The narrow T3 of the decoding tests (test_t3_torch, test_t3_alignment_capture): real key names,
# vocabularies and position tables, 2 layers narrowed to 256 wide (4 heads of 64, so alignment
# heads taken modulo fall in both layers) so that the many decoding runs stay fast on 2 cores.
# test_t3_model.py loads the real width.


@pytest.fixture(scope="module")
def t3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from .t3_checkpoint import write_random_t3_checkpoint

    return write_random_t3_checkpoint(
        tmp_path_factory.mktemp("t3"), n_layers=2, seed=0, hidden=256, intermediate=1024
    )


@pytest.fixture(scope="module")
def model(t3_dir: Path):
    from chatterbox_sidecar.engines.chatterbox.t3.model import T3Model

    return T3Model.from_safetensors(t3_dir / "t3_cfg.safetensors", max_positions=512)


@pytest.fixture(scope="module")
def tokenizer(t3_dir: Path):
    from chatterbox_sidecar.engines.chatterbox.t3.text import T3Tokenizer

    return T3Tokenizer(t3_dir / "tokenizer.json")
