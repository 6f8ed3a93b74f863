"""The dashboard and reports: pages rendered from the store's views, charts as inline SVG."""
