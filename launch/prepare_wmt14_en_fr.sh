#!/usr/bin/env bash
# WMT14 English-French for launch/configs/base_*.yaml with --set data.data_dir=data-bin/wmt14_en_fr
# (the user brings the text; nothing is downloaded).
#
#   RAW=/data/wmt14_en_fr bash launch/prepare_wmt14_en_fr.sh          # -> data-bin/wmt14_en_fr
#
# RAW holds plain (or .gz) parallel text, one sentence per line, aligned by line:
#   train.en train.fr   (Europarl v7 + Common Crawl + UN + News Commentary v9 + Gigaword, ~36M pairs)
#   valid.en valid.fr   (newstest2012+2013)  test.en test.fr   (newstest2014)
# A joint 40k BPE (fairseq's En-Fr recipe size). DEST, VOCAB, MAX_LEN, WORKERS and INPUT_SENTENCE_SIZE override;
# OVERWRITE=1 replaces what DEST already holds.
set -euo pipefail
source "$(dirname "$0")/common.sh"
mb_prepare_wmt en fr data-bin/wmt14_en_fr 40000
