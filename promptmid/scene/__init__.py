"""Large scenes: tile-by-tile matching with windowed reads, merged tie points, a global fit.

Pipeline of :func:`register_scene` (modules: ``grid``, ``windows``, ``matching``, ``model``, ``products``,
``pipeline``) (memory bounded: the model only ever sees one tile):

1. **prior** (optical px -> SAR px): from the geotransforms when both images are georeferenced
   (the SAR is read through a WarpedVRT in the optical CRS if the CRSs differ), else from a
   coarse match of decimated overviews (long side ``overview_side``).
2. **tiles**: a grid of ``tile`` x ``tile`` optical windows with ``overlap`` px overlap over the
   part of the optical image the SAR covers; at most ``max_tiles`` of them, spread evenly, matched
   spread-first (every prefix covers the scene) until ``settle`` of them agree on the global model.
3. per tile, the SAR is resampled through the prior onto the tile's optical grid enlarged by the
   search radius (a "chip"), the pair is matched and fitted (per-tile QC), and matches are mapped
   back to **scene coordinates** (optical px, SAR px).
4. **global fit** on the union of tile inliers: MAGSAC affine, then iterative least squares with
   residual rejection, as an affine or a 2nd-order polynomial (``poly2``).
5. products, written block by block: registered SAR GeoTIFF on the optical grid, tie points
   (CSV + GeoJSON), GCP VRT, tile map figure, ``result.json``.
"""

from __future__ import annotations

from promptmid.scene.grid import Tile, scene_tiles, select_tiles, spans, spread_order, tile_grid
from promptmid.scene.model import SCENE_MODELS, GlobalModel, fit_global
from promptmid.scene.pipeline import SCENE_PRODUCTS, SceneOptions, SceneResult, estimate_scene, register_scene, write_scene

__all__ = ["SCENE_MODELS", "SCENE_PRODUCTS", "GlobalModel", "SceneOptions", "SceneResult", "Tile", "estimate_scene", "fit_global",
           "register_scene", "scene_tiles", "select_tiles", "spans", "spread_order", "tile_grid", "write_scene"]
