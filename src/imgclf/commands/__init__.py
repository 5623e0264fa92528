"""The commands: one module per verb, each readable top to bottom.

    train.py         imgclf train (and the steps other commands share: prepare_data, finish_run)
    evaluate.py      imgclf evaluate
    cv.py            imgclf cv (k-fold cross-validation)
    label_issues.py  imgclf label-issues
    mine/            imgclf mine (hard negative mining)
    demo.py          imgclf demo
    run.py           Run: a run directory with its predictions and bundle

Commands return data and log what they do to the "imgclf" logger (progress through
`imgclf.progress`); a record that carries a table has a `view` (its kind) and `data`, which the
command line draws (`imgclf.cli.render`); its message is the table's title. `imgclf.api`
exposes the commands.
Nothing here is re-exported, so `imgclf.commands.train` is always the module.
"""
