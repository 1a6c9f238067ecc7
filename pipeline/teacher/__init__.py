"""The `prepare_teacher` stage: the teacher folder every later stage reads (`prepare_teacher`),
and the offline `builtin` teacher trained on the corpus itself (`builtin_teacher`)."""
