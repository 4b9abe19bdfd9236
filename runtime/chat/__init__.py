"""DeepSeek-V4 chat format: prompt encoding (encoding.py), completion parsing (parse.py), token ids
(tokenize.py), request options (options.py). See encoding.py and parse.py for the rules and where they differ from the official file."""

from .encoding import encode_messages  # noqa: F401
from .options import resolve_reasoning  # noqa: F401
from .parse import (IncrementalParser, ParseDelta, ParsedCompletion, ToolCallDelta,  # noqa: F401
                    call_id_factory, parse_completion)
from .tokenize import (decode_keep_special, encode_chat_ids, encode_prompt_ids,  # noqa: F401
                       missing_special_tokens, stream_decoder_keep_special)
