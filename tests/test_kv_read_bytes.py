"""``decode_read_bytes``: the KV bytes a decode row reads per step, against hand counts of each format
(model: 2 layers, 2 KV heads, head_dim 16, float32, so one token's K and V in full precision is
2 * 2 * 2 * 16 * 4 = 512 bytes)."""
import pytest
import torch

from kvscope.kv import registry
from kvscope.kv.base import KVSetup
from kvscope.models.config import ModelConfig

MODEL = ModelConfig(arch="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=16, max_position_embeddings=512)


def bound(spec: str):
    s = registry.create(spec)
    s.bind(KVSetup(MODEL, torch.device("cpu"), torch.float32, 1 << 20, 512, 4, 0))
    return s


@pytest.mark.parametrize("spec,context,expected", [
    ("paged", 37, 37 * 512),
    # one byte per element (128 per token) + float32 K and V scales per layer and head (2 * 2 * 2 * 4)
    ("quant:dtype=fp8", 37, 37 * 128 + 32),
    # per layer and 32-token block: codes 2 * 32 * 2 * 8 bytes, key scale + zero 2 * (2 * 16) * 2,
    # value scale + zero 2 * (32 * 2 * 1) * 2 (value groups of 16 channels): 1408; then 5 residual tokens
    ("quant:dtype=int4", 37, 2 * 1408 + 5 * 512),
    ("quant:dtype=int8", 64, 2 * 2 * (2 * 32 * 2 * 16 + 128 + 256)),
    # 7 pages held, bounds 2 * 2 * 2 * 16 * 4 = 512 bytes each; budget 25 tokens -> 2 pages: the first
    # (16 tokens) and the last (4 tokens)
    ("quest:budget_ratio=0.25", 100, 7 * 512 + 20 * 512),
    ("quest:budget=48", 100, 7 * 512 + (2 * 16 + 4) * 512),  # 3 pages
    ("quest:budget_ratio=1.0", 100, 7 * 512 + 100 * 512),
])
def test_decode_read_bytes(spec: str, context: int, expected: int) -> None:
    assert bound(spec).decode_read_bytes(context) == expected
