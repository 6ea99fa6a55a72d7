package sandbox

import (
	"fmt"
	"os"
	"strconv"
)

// testChildEnv makes the test binary act as a function process (Nomad's
// testtask habit): the value names what it does.
const testChildEnv = "FLUX_SANDBOX_TEST_CHILD"

func runTestChild(mode string, args []string) int {
	switch mode {
	case "alloc": // alloc MiB: touch that much memory, then report
		mib, _ := strconv.Atoi(args[0])
		mem := make([]byte, mib<<20)
		for i := 0; i < len(mem); i += 4096 {
			mem[i] = 1
		}
		fmt.Println("allocated", mib)
		return 0
	default:
		fmt.Fprintln(os.Stderr, "unknown test child mode", mode)
		return 2
	}
}
