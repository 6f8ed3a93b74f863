"""The deployment service: the long-lived coordinator, the SuperLink it supervises, the fleet
gateway, the admin API, certificates, and the dashboard and metrics it serves."""
