"""Site shapes: validation, hashing, JSON round trip."""

from __future__ import annotations

import json

import pytest

from slimfx.planning.shapes import AttentionShape, LinearShape, shape_from_dict


def test_round_trip_and_hash() -> None:
    shapes = [LinearShape(576, 192), AttentionShape(576, 9, 3, 64, rope_dim=64, layer_idx=2)]
    for s in shapes:
        assert shape_from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert len({*shapes, LinearShape(576, 192)}) == 2


def test_kv_bytes_per_token_counts_keys_and_values() -> None:
    # SmolLM2: 3 kv-heads × 64 dims, keys and values, 2 bytes each.
    assert AttentionShape(576, 9, 3, 64).kv_bytes_per_token() == 2 * 3 * 64 * 2
    assert AttentionShape(576, 9, 3, 64).kv_bytes_per_token(bits=4) == 3 * 64


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(hidden_size=576, num_heads=9, num_kv_heads=2, head_dim=64), "multiple of"),
        (dict(hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64, rope_dim=3), "even"),
        (dict(hidden_size=0, num_heads=9, num_kv_heads=3, head_dim=64), "hidden_size"),
    ],
)
def test_rejects_bad_attention_shapes(kwargs: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        AttentionShape(**kwargs)


def test_unknown_kind_and_field_are_named() -> None:
    with pytest.raises(ValueError, match="unknown site kind 'conv'"):
        shape_from_dict({"kind": "conv"})
    with pytest.raises(ValueError, match="bad linear shape"):
        shape_from_dict({"kind": "linear", "in_features": 1, "out_features": 2, "x": 3})
    with pytest.raises(ValueError, match="in_features"):
        LinearShape(True, 3)
