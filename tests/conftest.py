"""Shared fixtures: tiny, seeded models and inputs that every test layer can afford."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    # Triton kernels run on CPU only through the interpreter; set it before any test module
    # imports triton (the kernel tests would otherwise skip, depending on collection order).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _build_tiny_llama() -> nn.Module:
    pytest.importorskip("transformers")  # the hf extra is optional
    from slimfx.models import tiny_llama

    # slimfx.models.tiny_llama with LlamaConfig's own token ids (no padding row) and 128
    # positions: the model every test layer shares.
    return tiny_llama(seed=0, max_position_embeddings=128, pad_token_id=None)


def _build_tiny_ids() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, 16), generator=gen)


@pytest.fixture
def tiny_llama() -> nn.Module:
    """A 2-layer LlamaForCausalLM (hidden 64, 4 heads, 2 kv heads, vocab 256, tied lm_head).

    Seeded, eval mode, float32. Built fresh per test (≈50 ms) so tests may mutate it.
    """
    return _build_tiny_llama()


@pytest.fixture
def tiny_ids() -> torch.Tensor:
    """(2, 16) token ids in [0, 256)."""
    return _build_tiny_ids()


@pytest.fixture(scope="module")
def tiny_llama_captured() -> tuple[nn.Module, torch.Tensor, object]:
    """``(model, ids, captured)``: a tiny_llama exported once per test module (≈1 s).

    Shared by the tests of a module: read it, do not mutate it.
    """
    from slimfx.ir.capture import capture

    model, ids = _build_tiny_llama(), _build_tiny_ids()
    captured = capture(model, (), {"input_ids": ids, "use_cache": False}, fallback=False)
    return model, ids, captured


@pytest.fixture
def tiny_mlp() -> nn.Sequential:
    """Linear(16→32, bias) → ReLU → Linear(32→32, no bias) → ReLU → Linear(32→8, bias)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32),
        nn.ReLU(),
        nn.Linear(32, 32, bias=False),
        nn.ReLU(),
        nn.Linear(32, 8),
    ).eval()


@pytest.fixture(scope="module")
def one_thread():  # noqa: ANN201
    """One intra-op thread for a whole test module, restored after it. Opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``: on the shared 2-core machine, two
    OpenMP threads competing with other jobs made many small products ~40× slower (measured
    58 s → 1.4 s for tests/cost/test_family_sparse.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``@pytest.mark.slow`` tests run only with ``SLIMFX_SLOW=1`` (``make test-all``)."""
    if os.environ.get("SLIMFX_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set SLIMFX_SLOW=1 (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
