#!/usr/bin/env python3
"""python convert_alphaq.py MODEL --budget 3 [-o OUT.gguf]  ==  alphaq convert MODEL --budget 3"""

import sys

from alphaq.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
