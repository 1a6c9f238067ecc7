"""The second task: multilingual sequence classification distilled from stored class distributions.

`corpus` reads labeled, parallel corpora (SIB-200 by default) and owns row identity (lang, id,
text hash); `inference` loads a classifier and computes class log-probabilities in batches;
`teacher` is the `classify_teacher` stage; `store` owns the classification store (built on the
shared machinery of `pipeline.store.format`); `logits` is the `classify_logits` stage; `student`
the `classify_student` stage (its loss lives with the LM losses in `pipeline.student.losses`);
`evaluate` and `report` the `classify_evaluate` stage. Compression reuses `pipeline.compress`.
"""
