"""Students trained from stored soft labels, the `train_student` stage.

`losses` (sparse KD losses, exact where the store allows), `data` (streaming token ids + soft
labels in a fixed, resumable order), `model` (building and initialising the student),
`trainer` (the explicit loop body), `checkpoint` (atomic resumable state), `train_student`
(the stage: checks, provenance, loop, output).
"""
