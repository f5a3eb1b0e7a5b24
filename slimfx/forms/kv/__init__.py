"""KV-cache forms: the cache a decoder keeps per token, compressed.

Modules (import them directly; this package imports nothing, so ``config`` loads without
transformers):

- ``config``        ``KVDenseConfig``, ``KVQuantConfig`` (KIVI), ``KVLowRankConfig`` (Palu),
                    ``KVLatentQuantConfig``: registered decisions with exact bytes per token for
                    an ``AttentionShape`` (``cache_bytes``, ``bytes_per_token``, ``costs``),
                    ``check`` (why a site cannot take the form);
- ``form``          the registered ``Form`` of each config (``site_kind="attention"``), imported
                    by ``slimfx.forms``;
- ``numerics``      group quantization of keys / values / latents, packing, the low-rank k/v fit;
- ``calibrate``     attention-block inputs and Grams on calibration batches, ``fit_site``;
- ``simulate``      an attention block's output with a compressed cache in one pass,
                    ``attention_error`` (the form's error), ``SimulatedKVAttention``;
- ``cache``         ``KVCache``: a transformers ``Cache`` that ``generate()`` uses unchanged;
- ``static_cache``  ``StaticKVCache``: the static-shape variants (every form) for ``torch.compile``;
- ``lowrank``       ``apply_lowrank_kv``: k/v projections factorized, the cache holds the latent.

Attention sites come from ``slimfx.ir.find.inspect_attention_sites`` (one introspection of
Hugging Face attention blocks, shared with ``forms/mla``). The decode-attention kernel over the quantized store is ``slimfx.kernels.kv_attention``.
"""
