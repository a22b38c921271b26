"""Pixels in and out, as pure functions: bytes to RGB (imaging), labels to PNG, overlay, JSON
and masks (render), the legend and the page's sample images."""
