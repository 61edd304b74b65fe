/* emu_launch.cpp: the launcher of the host emulation (cuda_emu.h): the blocks of a grid one after
 * another, each on blockDim pthreads with a barrier between blocks. Test builds only. */
#include "cuda_emu.h"

thread_local uint3 emu_thread_idx, emu_block_idx;
thread_local dim3 emu_block_dim, emu_grid_dim;
thread_local emu_launch_state *emu_state;

namespace {
struct worker_arg {
    emu_launch_state *st;
    unsigned lin;
};

void *worker(void *p) {
    worker_arg *a = static_cast<worker_arg *>(p);
    emu_launch_state *st = a->st;
    emu_state = st;
    emu_block_dim = st->block;
    emu_grid_dim = st->grid;
    unsigned bx = st->block.x, by = st->block.y;
    emu_thread_idx.x = a->lin % bx;
    emu_thread_idx.y = (a->lin / bx) % by;
    emu_thread_idx.z = a->lin / (bx * by);
    for (unsigned z = 0; z < st->grid.z; z++)
        for (unsigned y = 0; y < st->grid.y; y++)
            for (unsigned x = 0; x < st->grid.x; x++) {
                emu_block_idx.x = x;
                emu_block_idx.y = y;
                emu_block_idx.z = z;
                (*st->body)();
                pthread_barrier_wait(&st->bar); /* the block's shared variables are free again */
            }
    return nullptr;
}
} // namespace

void emu_launch(dim3 grid, dim3 block, size_t shmem, const std::function<void()> &body) {
    unsigned n = block.x * block.y * block.z;
    if (n == 0 || grid.x * grid.y * grid.z == 0 || n > 1024) abort(); /* a real launch would fail */
    emu_launch_state st;
    st.grid = grid;
    st.block = block;
    st.shfl.assign(n, 0.0f);
    st.dyn.assign(shmem ? shmem : 1, 0);
    st.body = &body;
    pthread_barrier_init(&st.bar, nullptr, n);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 1 << 18);
    std::vector<pthread_t> th(n);
    std::vector<worker_arg> args(n);
    emu_device_enter();
    for (unsigned i = 0; i < n; i++) {
        args[i].st = &st;
        args[i].lin = i;
        if (pthread_create(&th[i], &attr, worker, &args[i])) abort();
    }
    for (unsigned i = 0; i < n; i++) pthread_join(th[i], nullptr);
    emu_device_leave();
    pthread_attr_destroy(&attr);
    pthread_barrier_destroy(&st.bar);
}
