"""Reading what comes back: bounce reports matched to our deliveries, classified, and acted on."""
