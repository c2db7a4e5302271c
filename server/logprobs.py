"""Log-probs in OpenAI's two shapes, with each token's own text and bytes.

A byte-level BPE token is a byte string that need not be valid UTF-8 on its own (CJK and emoji split across
tokens), so ``bytes`` carries the exact bytes and ``token`` their UTF-8 reading with U+FFFD for a partial
character, as OpenAI does.
"""
from __future__ import annotations

from functools import lru_cache


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable-character table, in which byte-level vocabularies are spelled."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class TokenText:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._decoder = _byte_decoder()
        self.bytes_of = lru_cache(maxsize=1 << 16)(self._bytes_of)

    def _bytes_of(self, token_id: int) -> bytes:
        piece = self.tokenizer.backend.id_to_token(token_id) if token_id < self.tokenizer.vocab_size else None
        if piece is None:  # embedding padding rows past the tokenizer
            return b""
        if all(ch in self._decoder for ch in piece):
            return bytes(self._decoder[ch] for ch in piece)
        return piece.encode("utf-8")  # an added (special) token is spelled as itself

    def text_of(self, token_id: int) -> str:
        return self.bytes_of(token_id).decode("utf-8", errors="replace")

    # ---- chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]} -----------------------------
    def chat_entry(self, token_id: int, logprobs: dict[int, float], top_n: int) -> dict:
        return {**self._one(token_id, logprobs[token_id]),
                "top_logprobs": [self._one(t, lp) for t, lp in _best(logprobs, top_n)]}

    def _one(self, token_id: int, logprob: float) -> dict:
        b = self.bytes_of(token_id)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": _finite(logprob), "bytes": list(b)}

    # ---- completions: {"tokens", "token_logprobs", "top_logprobs", "text_offset"} -----------------------------
    def completion_logprobs(self, token_ids: list[int], logprobs: list[dict[int, float] | None], top_n: int,
                            start_offset: int = 0) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = start_offset
        for tok, lps in zip(token_ids, logprobs):
            text = self.text_of(tok)
            out["tokens"].append(text)
            out["text_offset"].append(offset)
            offset += len(text)
            if lps is None:  # the first prompt token has no log-prob
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(_finite(lps[tok]))
            # the top_n alternatives and the token itself (vLLM's shape: n or n + 1 entries)
            best = {self.text_of(t): _finite(lp) for t, lp in _best(lps, top_n)}
            out["top_logprobs"].append({**best, text: _finite(lps[tok])})
        return out


def _best(logprobs: dict[int, float], n: int) -> list[tuple[int, float]]:
    """The n most likely of the entries (the sampled token is there too, and ranks where it ranks)."""
    return sorted(logprobs.items(), key=lambda kv: -kv[1])[:n]


def _finite(x: float) -> float:
    """JSON has no -inf: a token with probability 0 under float32 is reported at the smallest float, as vLLM."""
    return max(x, -9999.0)
