"""clustering: network build from the edges table, Infomap and Leiden, cluster tables
and exports."""
