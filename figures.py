"""Every figure REIR draws: a run's training curves (train.py, study.py's summary through figure_file), and
retrieval grids, a query and the images a run ranks first, each framed green (same class as the query) or red
(another class): inference.py draws one query's row, ablation.py the rows of two runs for the queries they
disagree on."""
import hashlib
import os

import pandas as pd
from PIL import Image, ImageDraw, ImageOps

import utils

TILE = 160          # side of each image in the grid, pixels
CAPTION = 22        # height of the caption under each image
FRAME = 5
GREEN, RED, WHITE = (40, 170, 60), (210, 40, 40), (255, 255, 255)


# ----------------------------------------------------------------------------- training curves

def figure_file(draw, figsize, columns=1, dpi=80):
    """A writer of a PNG that draw(axes) draws on a new matplotlib figure of columns panels. The figure is made
    without pyplot (no display, no global state), so that a background thread may write it
    (run_files.BackgroundWrites)."""
    def write(tmp):
        from matplotlib.figure import Figure
        figure = Figure(figsize=figsize)
        axes = figure.subplots(1, columns)
        draw(axes)
        figure.tight_layout()
        figure.savefig(tmp, format='png', dpi=dpi)
    return write


def curves_file(results):
    """results/<prefix>_curves.png: loss, training accuracy and the retrieval metrics over the epochs (test
    solid, validation dashed)."""
    def draw(axes):
        frame = pd.DataFrame(results)
        retrieval = [c for c in frame.columns if c.startswith(('test_', 'val_'))]
        panels = (('train loss', ['train_loss']), ('train accuracy (%)', ['train_accuracy']),
                  ('retrieval (%)' if any(c.startswith('val_') for c in retrieval) else 'test retrieval (%)',
                   retrieval))
        for axis, (title, columns) in zip(axes, panels):
            for column in columns:
                style = '--' if column.startswith('val_') else '-'
                label = column.removeprefix('test_').replace('val_', 'val ')
                axis.plot(frame['epoch'], frame[column], style, marker='o', label=label)
            axis.set_title(title)
            axis.set_xlabel('epoch')
            axis.grid(alpha=0.3)
            if len(columns) > 1:
                axis.legend(fontsize='small')
    return figure_file(draw, (15, 4), columns=3)


# ----------------------------------------------------------------------------- retrieval grids

def query_name(query_path):
    """<file name without extension>-<8 hex digits of its absolute path>: images named alike in different folders
    (0.jpg of every class) are told apart."""
    digest = hashlib.sha256(os.path.abspath(query_path).encode()).hexdigest()[:8]
    return f'{os.path.splitext(os.path.basename(query_path))[0]}-{digest}'


def framed(path, same_class=None, width=0, side=256):
    """An image resized to side x side, framed green (same_class True) or red (False) as the original REIR's
    inference.py and ablation.py save their retrieved images; unframed where same_class is None (the query)."""
    image = utils.load_rgb(path).resize((side, side), resample=Image.BILINEAR)
    if same_class is not None:
        ImageDraw.Draw(image).rectangle((0, 0, side - 1, side - 1), outline='green' if same_class else 'red',
                                        width=width)
    return image


def tile(path, caption, frame_colour, font):
    """One image letterboxed into a TILE square, framed, with a caption strip under it."""
    canvas = Image.new('RGB', (TILE, TILE + CAPTION), WHITE)
    image = ImageOps.contain(utils.load_rgb(path), (TILE - 2 * FRAME, TILE - 2 * FRAME))
    if frame_colour is not None:
        ImageDraw.Draw(canvas).rectangle([0, 0, TILE - 1, TILE - 1], outline=frame_colour, width=FRAME)
    canvas.paste(image, ((TILE - image.width) // 2, (TILE - image.height) // 2))
    ImageDraw.Draw(canvas).text((4, TILE + 4), caption, fill=(0, 0, 0), font=font)
    return canvas


def draw_grid(query_path, results, label, font, query_caption='query'):
    """Query first, then the retrieved images: [(path, similarity, class id)]; frames only when the query's
    class (label) is known."""
    tiles = [tile(query_path, query_caption, None, font)]
    for rank, (path, similarity, other) in enumerate(results, start=1):
        colour = None if label is None else (GREEN if other == label else RED)
        tiles.append(tile(path, f'{rank}: {similarity:.3f}', colour, font))
    grid = Image.new('RGB', (TILE * len(tiles), TILE + CAPTION), WHITE)
    for i, image in enumerate(tiles):
        grid.paste(image, (i * TILE, 0))
    return grid


def stack(rows):
    """Images one under another, left-aligned."""
    canvas = Image.new('RGB', (max(row.width for row in rows), sum(row.height for row in rows)), WHITE)
    top = 0
    for row in rows:
        canvas.paste(row, (0, top))
        top += row.height
    return canvas
