"""DeepSeek-V4 chat format: prompt encoding (encoding.py), completion parsing (parse.py), token ids
(tokenize.py), request options (options.py). See encoding.py and parse.py for the rules and where they
differ from the official file.

Serving one request:
    mode, effort = resolve_reasoning(req.thinking, req.reasoning_effort)
    ids = encode_chat_ids(tokenizer, req.messages, thinking_mode=mode, reasoning_effort=effort,
                          tools=req.tools)                       # InputError -> HTTP 400
    step = stream_decoder_keep_special(tokenizer)               # keeps </think>, DSML and EOS in the text
    parser = IncrementalParser(mode, tools=req.tools)           # tools=[] when tool_choice is "none"
    for token in generated: delta = parser.feed(step(token))    # stream delta.reasoning_content / .content /
    delta = parser.finish(); result = parser.result()           #   .tool_calls; then result.finish_reason
"""

from .encoding import encode_messages  # noqa: F401
from .options import resolve_reasoning  # noqa: F401
from .parse import (IncrementalParser, ParseDelta, ParsedCompletion, ToolCallDelta,  # noqa: F401
                    call_id_factory, parse_completion)
from .tokenize import (decode_keep_special, encode_chat_ids, encode_prompt_ids,  # noqa: F401
                       missing_special_tokens, stream_decoder_keep_special)
