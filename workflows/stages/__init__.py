"""The stages of a run, one module per stage, each reading and writing under RUN_DIR and skipping itself when its
manifest matches (workflows/artifacts.py: config keys, input fingerprints, manifests, resumable attempts). Each CLI
command (workflows/cli.py) calls one module here:

    prepare                  prepare.py   validate the labelled pairs, split them by query
    generate                 generate.py  MPCoT generation, the consistency filter, the statistics
    sft, dpo, teacher-eval   teacher.py   teacher SFT, conflict mining and DPO, base vs SFT vs DPO on the test split
    distill                  students.py  every student variant side by side, with its test metrics and verdicts
                                          (targets.py: the distillation targets; cv.py: the cross-validated form)
    ablate                   ablate.py    the lambda sweep per target source, each perspective alone, the other teacher
    score, eval              score.py     a pair file, or the test split, scored by a trained student
    run                      workflows/pipeline.py (the stages in order), then report.py: RUN_DIR/report.md

What the student stages share: examples.py (StudentData, the examples every variant streams), probe.py (the
targets' informativeness probe), verdicts.py (paired verdicts, the report's numbers and its metric tables).
common.py: the log line, the run folder, a heavy pass run as a Ray task.

Imports run one way: these modules import the domain packages (pairs, mpcot, teacher, student, serve) and hardware;
nothing there imports back up into workflows.
"""
