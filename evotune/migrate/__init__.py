"""``evotune migrate``: turn an InternEvo training config into an evotune config.

The translation keeps the training the same where evotune can:

* **Packs** are identical: ``max_length = seq_len * micro_bsz`` (InternEvo's
  ``packed_length``), ``max_length_per_sample = seq_len``, same ``min_length``,
  ``pack_sample_into_one`` and seed.
* **Packs per optimizer step** are identical: ``accumulative_counts`` is chosen so
  that evotune's ``dp * batch_size * accumulative_counts`` equals InternEvo's
  ``dp * micro_num``, so the packs of every optimizer step are InternEvo's.
* **Optimizer and schedule**: AdamW with InternEvo's lr, betas, eps, weight decay
  and clip; InternEvo's warm-up (``lr * (step + 1) / W``, ``W = int(total * ratio)``)
  and cosine to ``eta_min`` written as two phases that reproduce it step by step.

Every other key is reported in a table as *mapped*, *changed meaning*, *not
needed* or *unsupported*. The steps, one module each:

* evotune/migrate/read.py: evaluate the InternEvo config without running it;
* evotune/migrate/batch.py: InternEvo's parallel layout and evotune's equal batch;
* evotune/migrate/rules.py: what each InternEvo key becomes, as tables;
* evotune/migrate/translate.py: walk the tables, decide the multi-key cases;
* evotune/migrate/render.py: write the evotune config;
* evotune/migrate/migration.py: the four steps in order;
* evotune/migrate/cli.py: the command.

docs/migrating-from-internevo.md is the user's guide.
"""

from evotune.migrate.cli import add_arguments, main
from evotune.migrate.migration import migrate_internevo_config
from evotune.migrate.read import read_internevo_config

__all__ = ["add_arguments", "main", "migrate_internevo_config", "read_internevo_config"]
