"""The registered ops (namespace ``moelora::``), one folder each.

    molora_linear/     the core op (docs/spec.md §1)
    routing/           softmax + top-k routing (§2)
    expert_logprobs/   per-expert head log-probs (§5)

Each folder: ``op.py`` (validation, registered ops, fakes, autograd, the functional),
``reference.py`` (float64 ground truth), ``torch_backend.py`` / ``triton_backend.py`` (the
implementations), ``configs.py`` (launch choices). Shared: ``dispatch.py`` (the one backend
resolution), ``checks.py`` (index range checks), ``dtypes.py`` (precision rules),
``extension.py`` (the compiled csrc/ kernels), ``triton_common.py`` (Triton helpers).

The functionals are ``moelora.molora_linear``, ``moelora.topk_route``,
``moelora.expert_logprobs`` (here ``moelora.ops.<op>`` names the op's folder).
"""
