"""Structured output through xgrammar: token masks over the model's own vocabulary.

`Grammars(tokenizer, vocab_size)` builds xgrammar's TokenizerInfo from our tokenizer (the tiny default's
byte vocabulary: id 2 + b is byte b, BOS / EOS / unused ids are special; a tokenizer.json: its byte-level
tokens) and compiles, per request:
- response_format json_object (any JSON object) or json_schema (that schema);
- a DSML tool call (tool_choice "required": any of the tools; a named function: that one), written the
  way V4 writes calls: the `<｜DSML｜tool_calls>` block after a blank line, one invoke, one parameter per
  schema property (the required ones; all of them when none is required), strings raw with string="true",
  everything else JSON matching the property's own schema with string="false".
A grammar ends in EOS, so a finished structure is followed by the end of the turn. `compile` is the costly
step (the token masks over the vocabulary): the server runs it off the event loop, once per request, and
each choice gets its own cheap `matcher` of the compiled grammar. Tool schemas reach here checked
(schemas.py).
"""

from __future__ import annotations

import json

import torch
import xgrammar as xgr

from ..chat import tokens as T
from ..tokenizer import BYTE_OFFSET, ByteTokenizer
from .protocol import APIError


def _lit(s: str) -> xgr.Grammar:
    return xgr.Grammar.from_ebnf("root ::= " + json.dumps(s, ensure_ascii=False))


def _raw_string(max_len) -> xgr.Grammar:
    """A string="true" value: raw text without '<' (which would open a DSML tag), up to maxLength characters."""
    if type(max_len) is int and max_len >= 0:          # (not a bool: True is an int to isinstance)
        return xgr.Grammar.from_ebnf(f"root ::= [^<]{{0,{max_len}}}")
    return xgr.Grammar.from_ebnf("root ::= [^<]*")


def _json_safe(schema):
    """The schema with every length-bounded plain string given an equivalent pattern: xgrammar 0.2.9 writes
    min/maxLength strings with a character class that lets raw control characters through (invalid JSON);
    its pattern path escapes correctly. The pattern admits no quote or backslash (no escapes needed)."""
    if isinstance(schema, list):
        return [_json_safe(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _json_safe(v) for k, v in schema.items()}
    if out.get("type") == "string" and ("maxLength" in out or "minLength" in out) and not (
            {"pattern", "format", "enum", "const"} & set(out)):
        lo, hi = out.pop("minLength", 0), out.pop("maxLength", "")
        out["pattern"] = f'^[^\\x00-\\x1f"\\\\]{{{lo},{hi}}}$'
    return out


def _tokenizer_info(tokenizer, vocab_size: int) -> xgr.TokenizerInfo:
    if isinstance(tokenizer, ByteTokenizer):
        vocab = [bytes([i - BYTE_OFFSET]) if BYTE_OFFSET <= i < BYTE_OFFSET + 256 else b"" for i in range(vocab_size)]
        return xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, vocab_size=vocab_size,
                                 stop_token_ids=[tokenizer.eos])
    tok = tokenizer.tok
    vocab = [tok.id_to_token(i) or "" for i in range(vocab_size)]
    return xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.BYTE_LEVEL, vocab_size=vocab_size,
                             stop_token_ids=[tokenizer.eos])


class Matcher:
    """One sequence's grammar state."""

    def __init__(self, compiled, vocab_size: int):
        self.m = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits: torch.Tensor) -> None:
        self.m.fill_next_token_bitmask(self.bitmask)
        xgr.apply_token_bitmask_inplace(logits[None], self.bitmask)

    def accept(self, tok: int) -> None:
        self.m.accept_token(tok)

    def done(self) -> bool:
        return self.m.is_terminated()


class Grammars:
    def __init__(self, tokenizer, vocab_size: int):
        self.vocab_size = vocab_size
        self.compiler = xgr.GrammarCompiler(_tokenizer_info(tokenizer, vocab_size))

    def compile(self, grammar: xgr.Grammar):
        return self.compiler.compile_grammar(grammar)

    def matcher(self, compiled) -> Matcher:
        """A fresh grammar state for one sequence, from `compile`'s result."""
        return Matcher(compiled, self.vocab_size)

    # ---- what a request asks for -------------------------------------------------------------------
    def response_format(self, rf: dict) -> xgr.Grammar | None:
        kind = rf.get("type")
        if kind in (None, "text"):
            return None
        if kind == "json_object":
            return xgr.Grammar.builtin_json_grammar()
        if kind == "json_schema":
            js = rf.get("json_schema") or {}
            schema = js.get("schema") if isinstance(js, dict) else None
            if not isinstance(schema, dict):
                raise APIError(400, "response_format json_schema needs json_schema.schema (an object)",
                               param="response_format")
            return self._schema(schema, "response_format")
        raise APIError(400, f"response_format type {kind!r} is not supported; use text, json_object or "
                            "json_schema", param="response_format")

    def tool_call(self, tools: list[dict], name: str | None) -> xgr.Grammar:
        fns = [(t.get("function") or {}) for t in tools]
        if name is not None:
            fns = [f for f in fns if f.get("name") == name]
            if not fns:
                raise APIError(400, f"tool_choice names function {name!r}, which is not in tools", param="tool_choice")
        invokes = [self._invoke(f) for f in fns]
        body = invokes[0] if len(invokes) == 1 else xgr.Grammar.union(*invokes)
        return xgr.Grammar.concat(_lit("\n\n" + T.TOOL_CALLS_OPEN + "\n"), body, _lit("\n" + T.TOOL_CALLS_CLOSE))

    def _schema(self, schema: dict, param: str) -> xgr.Grammar:
        try:
            return xgr.Grammar.from_json_schema(json.dumps(_json_safe(schema)), any_whitespace=False)
        except Exception as e:       # xgrammar raises its own error types for schemas it cannot compile
            raise APIError(400, f"{param}: schema not supported by the grammar engine ({e})"[:300], param=param) from None

    def _invoke(self, fn: dict) -> xgr.Grammar:
        name = fn.get("name")
        params = fn.get("parameters") or {}
        props = params.get("properties") or {}
        keys = [k for k in props if k in (params.get("required") or [])] or list(props)
        parts = [_lit(f'{T.INVOKE_OPEN} name="{name}">\n')]
        for i, k in enumerate(keys):
            sub = props[k] if isinstance(props[k], dict) else {}
            sep = "\n" if i else ""
            if sub.get("type") == "string" and "enum" not in sub:
                parts += [_lit(f'{sep}{T.PARAM_OPEN} name="{k}" string="true">'),
                          _raw_string(sub.get("maxLength")), _lit(T.PARAM_CLOSE)]
            else:
                parts += [_lit(f'{sep}{T.PARAM_OPEN} name="{k}" string="false">'),
                          self._schema(sub or {"type": "object"}, "tools"), _lit(T.PARAM_CLOSE)]
        parts.append(_lit("\n" + T.INVOKE_CLOSE))
        return xgr.Grammar.concat(*parts)
