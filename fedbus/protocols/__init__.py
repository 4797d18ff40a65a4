"""fedbus.protocols (see DESIGN.md section 2)."""
