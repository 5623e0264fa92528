"""Training: a table of images and a model in, the best weights and their history out.

    models.py       timm backbones with a new head; freezing, layer groups, BatchNorm helpers
    task.py         single- vs multi-label: targets, loss, activation, monitored metric
    recipe.py       the techniques a config asks for, checked and resolved up front
    frozen_head.py  the frozen stage: the head trained on cached body features, LR finder
    schedule.py     one_cycle(step): the learning rate and momentum as a pure function
    fine_tune.py    the fine-tune recipe (frozen stage, then the whole network)
    features.py     the frozen body's cached features, BatchNorm adaptation, the start state
    ema.py          the moving average of the weights that the unfrozen stage validates
    engine.py       everything that touches Lightning (the only module that imports it)
    epochs.py       epoch rows, the best-epoch tracker, the fine-tuning check
    resume.py       seeded order and augmentation, so a killed run resumes exactly
    augment.py balance.py distributed.py preflight.py

Nothing here imports `imgclf.deploy` (its sibling) or anything above.
"""
