"""Fine-tuning: task data (``tasks``: reading, label maps, encoding, QA windows), metrics (``metrics``), task heads
(``heads``), configuration (``config``) and the training loop (``loop``)."""
