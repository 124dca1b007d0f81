"""Stop conditions of one sequence after each new token (vLLM's order: EOS and stop token ids,
stop strings, then length)."""
from __future__ import annotations

from kvscope.engine.outputs import Decoder
from kvscope.request import Request

_STOP_STR_LOOKBACK = 32  # extra characters re-decoded when checking for a stop string


def stop_reason(req: Request, tok: int, tokenizer: Decoder, token_limit: int) -> str | None:
    """Why ``req`` stops now that ``tok`` is its newest output token: ``"stop"``, ``"length"``
    (``max_tokens``, or ``token_limit`` tokens in all), or None. A matched stop string sets
    ``req.text_end``, where the returned text is cut."""
    p = req.params
    if tok in req.eos_token_ids or tok in p.stop_token_ids:
        return "stop"
    if p.stop and _match_stop_string(req, tokenizer):
        return "stop"
    if len(req.output_token_ids) >= p.max_tokens or req.num_known_tokens >= token_limit:
        return "length"
    return None


def _match_stop_string(req: Request, tokenizer: Decoder) -> bool:
    p = req.params
    text = tokenizer.decode(req.output_token_ids, skip_special_tokens=p.skip_special_tokens)
    window = max(len(s) for s in p.stop) + _STOP_STR_LOOKBACK
    start = max(0, len(text) - window)
    hits = [(text.find(s, start), s) for s in p.stop]
    hits = [(i, s) for i, s in hits if i >= 0]
    if not hits:
        return False
    i, s = min(hits)
    req.text_end = i + len(s) if p.include_stop_str_in_output else i
    return True
