"""The taco-cvgl command line: argparse and one call into the stages for each command."""
