import os, sys
sys.setswitchinterval(float(os.environ.get("EXP_SWITCH", "0.005")))
from service.cli.main import main
raise SystemExit(main(sys.argv[1:]))
