"""Long-context evaluation (design §6.1): passkey and RULER-style suites generated locally.

- ``grid``: length ("4k", "1m") and depth ("0:100:10") strings.
- ``context``: the sample record and what generators share (tokenizer, the essay corpus).
- ``tasks``: the task registry over the generators in ``needles`` (passkey, niah_*, vt), ``words``
  (cwe, fwe) and ``qa`` (qa_1 / qa_2, only from the user's SQuAD / HotpotQA files). Each returns a
  prompt of exactly the requested number of tokens for the model's own tokenizer, in ChatML, ending
  with the task's answer prefix.
- ``scoring``: per-sample scores (passkey exact match, RULER string_match_all / string_match_part).
- ``runner``: the jobs of a run, one LLM per mode, batched ``generate``, resume from the JSON.
- ``report``: the markdown tables (task x length per mode, Table 4 style averages) and heatmaps.
- ``cli``: ``qwen1m eval passkey`` and ``qwen1m eval ruler``.
"""
