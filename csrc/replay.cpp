// Replays engine calls recorded on one machine, to check the engine on an architecture
// the tests cannot run natively (ARM64 under qemu-aarch64: tests/test_cext_builds.py).
// Each call brings the memory its ops point into (whole tensor storages, so that views
// keep aliasing) and its ops, with every pointer given as a storage and an offset; the
// replay copies the storages into fresh memory, points the ops there, runs the call, and
// writes the storages out for the recorder to compare with its own results.
//
// Usage: replay CALLS RESULTS. CALLS holds int64s: slots per op, the number of calls, then
// per call: dtype (0 float32, 1 float64), storages, ops; each storage's size in bytes and
// bytes; the ops' slots; for each slot, its storage (-1: a plain value, not a pointer).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

extern "C" {
int fp_op_slots();
void fp_run_float32(const void* ops, int64_t count);
void fp_run_float64(const void* ops, int64_t count);
}

namespace {

FILE* in;

int64_t next() {
    int64_t value;
    if (std::fread(&value, sizeof value, 1, in) != 1) std::exit(3);
    return value;
}

void read(void* to, int64_t bytes) {
    if (std::fread(to, 1, bytes, in) != static_cast<size_t>(bytes)) std::exit(3);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 3 || !(in = std::fopen(argv[1], "rb"))) return 2;
    FILE* out = std::fopen(argv[2], "wb");
    const int64_t slots = next();
    if (!out || slots != fp_op_slots()) return 2;
    for (int64_t calls = next(); calls > 0; --calls) {
        const int64_t dtype = next(), storages = next(), count = next();
        std::vector<void*> memory(storages);
        std::vector<int64_t> sizes(storages), ops(count * slots), where(count * slots);
        for (int64_t s = 0; s < storages; ++s) {
            sizes[s] = next();
            memory[s] = std::aligned_alloc(64, (sizes[s] + 63) / 64 * 64 + 64);  // torch aligns storages to 64
            read(memory[s], sizes[s]);
        }
        read(ops.data(), count * slots * sizeof(int64_t));
        read(where.data(), count * slots * sizeof(int64_t));
        for (int64_t i = 0; i < count * slots; ++i)
            if (where[i] >= 0) ops[i] += reinterpret_cast<int64_t>(memory[where[i]]);
        (dtype ? fp_run_float64 : fp_run_float32)(ops.data(), count);
        for (int64_t s = 0; s < storages; ++s) {
            std::fwrite(memory[s], 1, sizes[s], out);
            std::free(memory[s]);
        }
    }
    return std::fclose(out) == 0 ? 0 : 4;
}
