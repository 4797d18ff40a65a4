"""fedbus.nodes (see DESIGN.md section 2)."""
