"""DeepSeek-V4 chat special-token strings and the fixed prompt texts of the official encoding.

The texts here are data the model was trained on: they must stay byte-identical to the official
`encoding/encoding_dsv4.py` of the V4 release (checked by the golden vectors in tests/test_chat_encoding.py).
"""

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"

# Quick-instruction task tokens (internal DeepSeek classification tasks, `task` on a user message).
TASK_TOKENS = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}

# Every special-token string the encoder writes (the tokenizer must map each to one id).
SPECIAL_TOKENS = (BOS, EOS, USER, ASSISTANT, LATEST_REMINDER, THINK_START, THINK_END, DSML,
                  *TASK_TOKENS.values())

# DSML markup pieces (the `｜DSML｜` token inside angle brackets).
TOOL_CALLS_OPEN = f"<{DSML}tool_calls>"
TOOL_CALLS_CLOSE = f"</{DSML}tool_calls>"
INVOKE_OPEN = f"<{DSML}invoke"
INVOKE_CLOSE = f"</{DSML}invoke>"
PARAM_OPEN = f"<{DSML}parameter"
PARAM_CLOSE = f"</{DSML}parameter>"
# What separates content from a tool-call block in the assistant turn (and what the parser looks for).
TOOL_BLOCK_START = f"\n\n<{DSML}tool_calls"

# Prepended to message 0 in thinking mode with reasoning_effort="max" (V4-Pro / V4-Flash release text).
REASONING_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)

RESPONSE_FORMAT_HEADER = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"

TOOLS_HEADER = (
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "
    f"\"{TOOL_CALLS_OPEN}\" block like the following:\n\n"
    f"{TOOL_CALLS_OPEN}\n"
    f"{INVOKE_OPEN} name=\"$TOOL_NAME\">\n"
    f"{PARAM_OPEN} name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE{PARAM_CLOSE}\n"
    "...\n"
    f"{INVOKE_CLOSE}\n"
    f"{INVOKE_OPEN} name=\"$TOOL_NAME2\">\n"
    "...\n"
    f"{INVOKE_CLOSE}\n"
    f"{TOOL_CALLS_CLOSE}\n\n"
    "String parameters should be specified as is and set `string=\"true\"`. For all other types (numbers, "
    "booleans, arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n\n"
    f"If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete reasoning inside "
    f"{THINK_START}...{THINK_END} BEFORE any tool calls or final response.\n\n"
    f"Otherwise, output directly after {THINK_END} with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
)
TOOLS_FOOTER = ("\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke "
                "tool calls.\n")
