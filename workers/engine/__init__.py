"""The engine process (`python -m workers.engine`): the device, the models, torch.

- `server`: the process — its channel to the shell, the warm variant cache (`cache`), loading
  (`loading`, `memory`), and every torch call on one thread (`device`).
- the engines: text (`text`, decoded continuously: `continuous` over the paged KV cache `kv`,
  `constrain` for grammars, `sampling`), multimodal (`multimodal`, `generation`), speech
  (`whisper`, `whisper_ct2`), `echo`; `batcher` runs their batches; `tiny_models` builds the
  tiny test models.
"""
