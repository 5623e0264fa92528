"""Hard negative mining: teach a trained classifier what none of its classes looks like.

A softmax model must call every image one of its classes, so a photo of none of them gets a
confident wrong label. Mining adds a `negative` class (multi-label: an empty label set, no new
class), scores a pool of unlabelled images that contain none of the classes, trains on the most
confidently wrong ones, and repeats:

    round 0   grow the head by one class (trained rows kept) and seed it with `initial` random
              pool images, fine-tune, evaluate
    round k   score the mining part U of the pool with round k-1's model, add its `per_round`
              most confident false positives to training, fine-tune from round k-1's weights,
              evaluate

The pool is split once (seeded) into U and a held-out part V that joins the validation set, so
the false-positive rate on V measures what mining bought on images it never trained on. The best
round (validation accuracy over positives + V) becomes the run's bundle.

Everything lives in `<run>/mining/`: manifest.json (settings; per round the picks, metrics and
weights file; rewritten atomically after every step, so rerunning the command continues where an
interruption stopped), pool.json (the U/V split), original/ (the run's files before mining),
round_<k>.safetensors and rounds.json (the per-round table the report renders). User images are
only read, never copied, moved or written.

    state.py     settings, results and the files in <run>/mining/
    pool.py      listing and scoring the pool; the pure selection rules
    rounds.py    one round: training data, fine-tuning, evaluation; the rounds table
    command.py   `mine`, which runs the rounds and keeps the best
"""

from imgclf.commands.mine.command import mine
from imgclf.commands.mine.pool import (better, false_positive_scores, score_pool, split_pool,
                                       top_false_positives)
from imgclf.commands.mine.rounds import round_metrics
from imgclf.commands.mine.state import MINING_DIR, MineOptions, MiningResult

__all__ = ["mine", "MineOptions", "MiningResult", "MINING_DIR", "split_pool",
           "false_positive_scores", "top_false_positives", "better", "score_pool",
           "round_metrics"]
