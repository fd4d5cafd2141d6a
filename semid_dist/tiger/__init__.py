"""TIGER mode: an RQ-VAE (semid_dist/math/rqvae.py) trained with PyTorch DDP under Ray Train.

Modules, driver to worker:
  trainer.py      driver: run name and storage, TorchTrainer, outputs and plots
  progress.py     rank 0's intake and epoch records logged on the driver as they arrive
  worker.py       the train_loop_per_worker Ray Train runs on every rank (reads top to bottom)
  steps.py        one epoch, evaluation and codebook initialisation; no Ray, collectives passed in
  sample.py       what tiger trains on: every item, or a hash sample (--train_sample_gb)
  batches.py      deterministic global batches and the validation split (numpy only)
  collectives.py  all_reduce / broadcast / all_gather over torch.distributed, no-ops at world 1
  checkpoint.py   what a checkpoint holds, and the original tool's checkpoint_epoch_*.pt payload
  plots.py        loss curves and per-level code-usage histograms (matplotlib, Agg)
"""
