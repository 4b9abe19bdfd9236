"""`python -m runtime.bench`: speed and memory figures, printed as a table and written as JSON (issue 6).

Each scenario runs in its own child process (`runtime.bench.child`) so its peak RSS is its own: load an
engine, warm it up (a short prefill and a few decode steps), prefill a prompt of N tokens in chunks
(median / min / max over repeats), then time single-token decode steps at that context (median, p10, p90),
read the state's bytes and the process's peak RSS. Engines: this runtime under any profile (`ours`), the
same model with dense attention over every past token (`dense`: every layer a sliding window as long as the
context, no compression: what V4 would cost without CSA/HCA), transformers' `DeepseekV4ForCausalLM` on the
same checkpoint (`transformers`), and the exported graphs on ONNX Runtime (`onnx`). The machine's memory
bandwidth is measured in process, and a decode of a model with >= 200 MB of active weights is set against it.
Nothing here is a test: tests/test_bench.py runs a tiny case end to end without timing anything.
"""
