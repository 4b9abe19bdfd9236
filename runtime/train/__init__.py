"""Training the V4 graph (issue 18): `python -m runtime.train`.

- `data`: the corpus, the Python standard library's own source (PSF licence), with a deterministic held-out
  split by file;
- `tokenizer`: a byte-level BPE trained with `tokenizers`, saved as an official-style tokenizer.json that
  holds V4's special tokens (BOS id 0, EOS id 1, the chat tokens);
- `objective`: the losses on the runtime's own model code (autograd through the reference ops): next token,
  the MTP block's next-next token, and the lightning indexer's KL to the main attention over compressed
  entries; straight-through fake quantisation of the shipped formats for the QAT phase;
- `loop`: the seeded, resumable loop (safetensors checkpoints, no pickle) and the official-layout export;
- `__main__`: the command line.
"""
