"""Bring your own model: pretrained checkpoints in, the next-token model out.

* ``hf``: a Hugging Face ``LlamaForCausalLM``/``Qwen2ForCausalLM`` directory becomes an
  mtp checkpoint (trunk = all layers but the last, head 0 = the last layer, new heads
  copied from it or freshly initialised);
* ``meta``: Meta's released multi-token checkpoints (``params.json`` +
  ``consolidated.*.pth``, extra heads under ``extra_heads``);
* ``export``: trunk + head 0 of an mtp checkpoint back to a Hugging Face directory.

Every conversion streams one tensor at a time into the output file (``stream``),
checks names and shapes against the model it describes before writing, and writes
into a temporary directory renamed at the end, so a bad input leaves nothing behind.
No MLflow or Ray here: ``jobs/import_model.py`` registers what these write.
"""
