"""A two-page PDF for the integrations' tests: a text page, then a photo with its caption."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

TEXT = "Espresso is brewed by forcing hot water through finely ground coffee."
CAPTION = "Chelsea the cat looks straight at the camera."


def write_report(path: Path, photo: Image.Image) -> Path:
    from fpdf import FPDF

    pdf = FPDF(format="A4")
    pdf.add_page()
    pdf.set_font("Helvetica", size=12)
    pdf.multi_cell(0, 6, TEXT)
    pdf.add_page()
    pdf.image(photo, x=20, y=20, w=120)
    pdf.set_y(120)
    pdf.multi_cell(0, 6, CAPTION)
    pdf.output(str(path))
    return path
