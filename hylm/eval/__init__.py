"""Evaluation of hylm models. `tasks`: accuracy per synthetic-curriculum task (`hylm eval-tasks`,
`python -m hylm.eval`)."""
