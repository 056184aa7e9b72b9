"""Retrieval figures: a query and the images a run ranks first, each framed green (same class as the query) or
red (another class). inference.py draws one query's row, ablation.py the rows of two runs for the queries they
disagree on."""
from PIL import Image, ImageDraw, ImageOps

import utils

TILE = 160          # side of each image in the grid, pixels
CAPTION = 22        # height of the caption under each image
FRAME = 5
GREEN, RED, WHITE = (40, 170, 60), (210, 40, 40), (255, 255, 255)


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
