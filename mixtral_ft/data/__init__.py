"""The data stage: where rows come from (files, Hub ids, built-in samples, mixtures), the Mixtral tokenizer,
and conversations or preference pairs → Mixtral chat-format ids with exact loss masks."""
