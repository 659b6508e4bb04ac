#!/usr/bin/env bash
# Install the fonts that models/ocr.py renders the OCR benchmark data with (DejaVu, from the
# Debian package fonts-dejavu-core). Debian/Ubuntu; needs root or sudo.
set -euo pipefail
if dpkg -s fonts-dejavu-core >/dev/null 2>&1; then
    echo "fonts-dejavu-core is already installed"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends fonts-dejavu-core
