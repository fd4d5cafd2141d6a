"""Rank 0's progress on the driver: the intake and every epoch's record, logged as they arrive
through a Ray queue (raytrain.ProgressLog; the workers' own output is not forwarded to the driver)."""

from __future__ import annotations

import logging

log = logging.getLogger("semid_dist")


def log_record(r: dict) -> None:
    if "resumed" in r:  # the workers (re)started from a checkpoint: a failure or --resume
        log.info(
            "tiger: resumed from checkpoint after epoch %d (step %d)",
            r["resumed"]["epoch"],
            r["resumed"]["step"],
        )
        return
    if "intake" in r:  # rank 0 has its rows in memory; the epochs start
        i = r["intake"]
        log.info(
            "tiger: %d rows in the workers' memory (%d on rank 0 of %d), read in %.1f s",
            i["rows"],
            i["rank_rows"],
            i["workers"],
            i["seconds"],
        )
        return
    val = (
        ""
        if r.get("val_recon") is None
        else f" | val recon {r['val_recon']:.4f} (rel {r['val_rel_recon']:.4f})"
    )
    temp = "" if r.get("temperature") is None else f" | tau {r['temperature']:.3f}"
    catalog = (
        ""
        if r.get("rel_recon") is None
        else (
            f" | rel recon {r['rel_recon']:.4f} | codes used {r['codes_used']} ppl "
            f"{[round(p) for p in r['perplexity']]} | dup {100 * r['dup_rate']:.2f}%"
        )
    )
    log.info(
        "epoch %d/%d: loss %.4f recon %.4f commit %.4f%s%s | restarts %s | lr %.2g%s | %.1f s%s",
        r["epoch"],
        r["epochs"],
        r["loss"],
        r["recon"],
        r["commit"],
        val,
        catalog,
        r["restarted"],
        r["lr"],
        temp,
        r["time_s"],
        " (early stop)" if r.get("stopped_early") else "",
    )
