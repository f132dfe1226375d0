// CUDA kernels of the four deconvcuda operators (schemas in csrc/ops.cpp, semantics in docs/DESIGN.md).
//
// Layout as torchvision's roi_align_kernel.cu: kernels in an anonymous namespace, templated on the
// scalar type; host functions that check their arguments (csrc/common/checks.h, shared with the
// CPU kernels), make the inputs contiguous NCHW, dispatch on the dtype and launch on the current
// stream; one TORCH_LIBRARY_IMPL block at the end.
//
// Every kernel is a gather: one thread owns its output elements and writes each exactly once, so
// there are no atomics and results repeat bit for bit. Accumulation is in at::opmath_type<scalar_t>
// (float for half and bfloat16). The work one thread does for one output element is a
// __host__ __device__ function in elements.cuh (for the fused op's staged kernel: its steps, and
// the staging of its shared memory), so the kernels' exact arithmetic can also be run, and
// checked, on a machine without a GPU (tests/test_cuda_emulation.py).
//
// Only c10's CUDA headers are included, not ATen/cuda/CUDAContext.h: that one pulls in the cuBLAS,
// cuSPARSE and cuSOLVER headers, which a CUDA toolkit with just nvcc and the runtime lacks (the
// libraries come with the torch wheel), and it slows the compile down for nothing used here.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "common/checks.h"
#include "common/geometry.h"
#include "common/rules.h"
#include "cuda/elements.cuh"

namespace deconvcuda {
namespace {

using cuda_elements::FusedShape;
using cuda_elements::Routed;
using geometry::Conv2d;
using geometry::Pool2d;

using cuda_elements::kThreadsPerBlock;

// The grid of a grid-stride kernel covers the GPU this many times over (whole waves of the blocks
// the multiprocessors hold at once); its loops cover the rest.
constexpr int64_t kWaves = 4;

int multiprocessor_count() {
  int multiprocessors = 0;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return multiprocessors;
}

// Blocks of kThreadsPerBlock threads of `kernel` that one multiprocessor of the current GPU holds at
// once with `shared_bytes` of dynamic shared memory: the CUDA runtime's occupancy calculator, from the
// kernel's registers and shared memory and the GPU's limits (at least 1, so a launch is never sized
// to nothing).
template <typename Kernel>
int64_t blocks_per_multiprocessor(Kernel kernel, size_t shared_bytes) {
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreadsPerBlock, shared_bytes));
  return std::max(blocks, 1);
}

// Blocks for a grid-stride launch of `kernel` over `work_items`: kWaves waves of what the GPU holds
// at once, never more than the items need.
template <typename Kernel>
int64_t blocks_for(Kernel kernel, int64_t work_items) {
  const int64_t resident_blocks = int64_t(multiprocessor_count()) * blocks_per_multiprocessor(kernel, 0);
  return std::max<int64_t>(1, std::min(geometry::ceil_div(work_items, kThreadsPerBlock), kWaves * resident_blocks));
}

// The linear index of this thread's first work item and the stride between its items, in int64 so
// that tensors past 2^31 elements are covered.
__device__ __forceinline__ int64_t first_work_item() {
  return int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t work_item_stride() {
  return int64_t(gridDim.x) * blockDim.x;
}

// f(index_t{}) with int32_t where every tensor of the call fits 32-bit indexing, else int64_t.
template <typename F>
void with_index_type(bool fits_int32, F&& f) {
  if (fits_int32) {
    f(int32_t{});
  } else {
    f(int64_t{});
  }
}

// --------------------------------------------------------------------------------------------- //
// max_pool2d_switches
// --------------------------------------------------------------------------------------------- //

template <typename index_t, typename scalar_t>
__global__ void max_pool2d_switches_kernel(int64_t total, const scalar_t* __restrict__ input,
                                           scalar_t* __restrict__ output, uint8_t* __restrict__ switches,
                                           int64_t height, int64_t width, int64_t pooled_h, int64_t pooled_w,
                                           Pool2d pool) {
  for (int64_t index = first_work_item(); index < total; index += work_item_stride()) {
    cuda_elements::max_pool2d_switches_element<index_t>(index, input, output, switches, height, width, pooled_h,
                                                        pooled_w, pool);
  }
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_switches_cuda(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                            at::IntArrayRef stride, at::IntArrayRef padding,
                                                            at::IntArrayRef dilation, bool ceil_mode) {
  const Pool2d pool = checks::check_max_pool2d_switches(input, kernel_size, stride, padding, dilation, ceil_mode);
  at::cuda::CUDAGuard device_guard(input.device());

  const int64_t batch = input.size(0), channels = input.size(1);
  const int64_t height = input.size(2), width = input.size(3);
  const int64_t pooled_h =
      geometry::pool_output_size(height, pool.kernel_h, pool.stride_h, pool.padding_h, pool.dilation_h, ceil_mode);
  const int64_t pooled_w =
      geometry::pool_output_size(width, pool.kernel_w, pool.stride_w, pool.padding_w, pool.dilation_w, ceil_mode);
  // Outputs in the input's memory format, as the CPU kernel and PyTorch's max_pool2d return them:
  // empty ones allocated so, the others computed NCHW and converted.
  const auto format = input.suggest_memory_format() == at::MemoryFormat::ChannelsLast ? at::MemoryFormat::ChannelsLast
                                                                                      : at::MemoryFormat::Contiguous;
  if (batch * channels * pooled_h * pooled_w == 0) {
    return {at::empty({batch, channels, pooled_h, pooled_w}, input.options().memory_format(format)),
            at::empty({batch, channels, pooled_h, pooled_w}, input.options().dtype(at::kByte).memory_format(format))};
  }
  at::Tensor output = at::empty({batch, channels, pooled_h, pooled_w}, input.options());
  at::Tensor switches = at::empty({batch, channels, pooled_h, pooled_w}, input.options().dtype(at::kByte));
  const at::Tensor input_nchw = input.contiguous();
  const int64_t total = output.numel();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "max_pool2d_switches_cuda", [&] {
    with_index_type(cuda_elements::fits_int32({input.numel(), total}), [&](auto index_type) {
      const auto kernel = max_pool2d_switches_kernel<decltype(index_type), scalar_t>;
      kernel<<<blocks_for(kernel, total), kThreadsPerBlock, 0, stream>>>(
          total, input_nchw.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(),
          switches.mutable_data_ptr<uint8_t>(), height, width, pooled_h, pooled_w, pool);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {output.contiguous(format), switches.contiguous(format)};
}

// --------------------------------------------------------------------------------------------- //
// unpool_relu
// --------------------------------------------------------------------------------------------- //

template <typename Rule, typename index_t, typename scalar_t>
__global__ void unpool_relu_kernel(int64_t total, const scalar_t* __restrict__ grad, const bool* __restrict__ positive,
                                   const uint8_t* __restrict__ switches, scalar_t* __restrict__ output,
                                   int64_t height, int64_t width, int64_t pooled_h, int64_t pooled_w, Pool2d pool) {
  for (int64_t index = first_work_item(); index < total; index += work_item_stride()) {
    cuda_elements::unpool_relu_element<Rule, index_t>(index, grad, positive, switches, output, height, width,
                                                      pooled_h, pooled_w, pool);
  }
}

at::Tensor unpool_relu_cuda(const at::Tensor& grad, const at::Tensor& switches, at::IntArrayRef input_size,
                            at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, c10::string_view rule,
                            const std::optional<at::Tensor>& positive) {
  const auto call =
      checks::check_unpool_relu(grad, switches, input_size, kernel_size, stride, padding, dilation, rule, positive);
  at::cuda::CUDAGuard device_guard(grad.device());

  const int64_t height = input_size[0], width = input_size[1];
  const int64_t pooled_h = grad.size(2), pooled_w = grad.size(3);
  at::Tensor output = at::empty({grad.size(0), grad.size(1), height, width}, grad.options());
  if (output.numel() == 0) {
    return output;
  }
  if (grad.numel() == 0) {
    // A pool that yields no windows (input_size smaller than one window): nothing to unpool.
    return output.zero_();
  }

  const at::Tensor grad_nchw = grad.contiguous();
  const at::Tensor switches_nchw = switches.contiguous();
  const checks::Mask mask(positive);
  const int64_t total = output.numel();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "unpool_relu_cuda", [&] {
    rules::dispatch_rule(call.rule, mask.present(), [&](auto rule_type) {
      with_index_type(cuda_elements::fits_int32({grad.numel(), output.numel()}), [&](auto index_type) {
        const auto kernel = unpool_relu_kernel<decltype(rule_type), decltype(index_type), scalar_t>;
        kernel<<<blocks_for(kernel, total), kThreadsPerBlock, 0, stream>>>(
            total, grad_nchw.const_data_ptr<scalar_t>(), mask.data(), switches_nchw.const_data_ptr<uint8_t>(),
            output.mutable_data_ptr<scalar_t>(), height, width, pooled_h, pooled_w, call.pool);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return output;
}

// --------------------------------------------------------------------------------------------- //
// deconv2d: cuDNN's transposed convolution, deterministic
// --------------------------------------------------------------------------------------------- //

// --------------------------------------------------------------------------------------------- //
// unpool_relu_deconv2d: the route pass and the fused sparse gather (elements.cuh)
// --------------------------------------------------------------------------------------------- //

// The route pass: one Routed entry per pooled value (its switch decoded once, the rule applied).
template <typename Rule, typename index_t, typename scalar_t>
__global__ void route_kernel(int64_t total, const scalar_t* __restrict__ grad, const bool* __restrict__ positive,
                             const uint8_t* __restrict__ switches,
                             Routed<at::opmath_type<scalar_t>, index_t>* __restrict__ routed, int64_t height,
                             int64_t width, int64_t pooled_h, int64_t pooled_w, Pool2d pool, Conv2d conv,
                             bool overlapping) {
  for (int64_t index = first_work_item(); index < total; index += work_item_stride()) {
    cuda_elements::route_element<Rule, index_t>(index, grad, positive, switches, routed, height, width, pooled_h,
                                                pooled_w, pool, conv, overlapping);
  }
}

// The global-memory gather: each thread walks whole work items of [N, groups, C_in_per_group, out_h,
// out_w], one input channel each, and reads its taps from the weight in global memory. The
// fallback of the staged kernel below: for 64-bit indices (tensors past 2^31 elements) and for
// filters so large that not one output channel's taps fit kStagedFilterBytes (choose_fused_launch).
template <typename index_t, typename scalar_t>
__global__ void unpool_relu_deconv2d_kernel(int64_t total,
                                            const Routed<at::opmath_type<scalar_t>, index_t>* __restrict__ routed,
                                            const scalar_t* __restrict__ weight, scalar_t* __restrict__ output,
                                            FusedShape shape, Pool2d pool, Conv2d conv) {
  for (int64_t index = first_work_item(); index < total; index += work_item_stride()) {
    cuda_elements::unpool_relu_deconv2d_element<index_t>(index, routed, weight, output, shape, pool, conv);
  }
}

// The staged gather (32-bit indices). Work mapping:
//   blockIdx.x            one (group, channel tile) slice: every thread of the block reads the same
//                         filter taps, which the block stages in shared memory (elements.cuh).
//   blockIdx.y, threadIdx  a run of blockDim.x consecutive items of the slice's [N, out_h, out_w];
//                         block rows past gridDim.y are walked in a loop (gridDim.y <= 65535).
// Blocks are numbered x first, so the slices' blocks for the same run of pixels are launched
// together and read the same entries (all of the group's co, at those pixels) while they are in
// L2: the entries should come from memory about once, not once per channel tile (the order blocks
// start in is the hardware's, in practice this one).
//
// What a warp reads, for one co and one step of the walk over windows: its 32 threads are 32
// consecutive x of one output row (or the end of one row and the start of the next), so with a
// stride-1 conv their windows are consecutive or equal pooled columns of one or two pooled rows:
// the entries (8 bytes each) fall in two to four 32-byte sectors. The taps come from shared memory:
// a thread's kChannels taps of one filter position in one to eight 16-byte loads, the positions
// padded apart so that the few different positions a warp reads lie in different banks. Its stores
// are 32 consecutive x of each of its channels' output rows: coalesced.
//
// Barriers: every thread of the block runs every iteration of both loops (their bounds depend only
// on blockIdx, gridDim, the shape and the chunk size), so every thread reaches every __syncthreads;
// threads whose item is past the slice's end help stage and skip only the walk and the store.
// tests/cuda_emulation.cpp runs this kernel's blocks on the host with the same helpers.
template <int kChannels, typename scalar_t>
__global__ void unpool_relu_deconv2d_staged_kernel(int64_t batch,
                                                   const Routed<at::opmath_type<scalar_t>, int32_t>* __restrict__ routed,
                                                   const scalar_t* __restrict__ weight, scalar_t* __restrict__ output,
                                                   FusedShape shape, Pool2d pool, Conv2d conv,
                                                   int32_t out_channels_per_chunk) {
  using index_t = int32_t;
  using acc_t = at::opmath_type<scalar_t>;
  // One untyped buffer for every instance: extern __shared__ arrays of different element types in
  // the instances of one template would be conflicting declarations of the same symbol.
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  scalar_t* staged = reinterpret_cast<scalar_t*>(shared_bytes);

  const cuda_elements::StagedSlice<index_t> slice =
      cuda_elements::staged_slice<kChannels, index_t>(static_cast<index_t>(blockIdx.x), shape);
  const index_t in_per_group = static_cast<index_t>(shape.in_channels_per_group);
  const index_t taps_per_filter = static_cast<index_t>(conv.kernel_h * conv.kernel_w);
  // Items of the slice: N * out_h * out_w, below 2^31 as the output has at least as many elements.
  const index_t items = static_cast<index_t>(batch * shape.out_h * shape.out_w);
  const index_t item_blocks = (items + static_cast<index_t>(blockDim.x) - 1) / static_cast<index_t>(blockDim.x);

  for (index_t block = static_cast<index_t>(blockIdx.y); block < item_blocks;
       block += static_cast<index_t>(gridDim.y)) {
    // block * blockDim.x + threadIdx.x < item_blocks * blockDim.x < items + blockDim.x: below 2^31
    const index_t item_index = block * static_cast<index_t>(blockDim.x) + static_cast<index_t>(threadIdx.x);
    const bool active = item_index < items;
    cuda_elements::FusedWorkItem<index_t> item{};
    if (active) {
      item = cuda_elements::staged_work_item<kChannels, index_t>(slice, item_index, shape, pool, conv);
    }
    acc_t acc[kChannels];
    for (int t = 0; t < kChannels; ++t) acc[t] = acc_t(0);

    for (index_t co_begin = slice.first_out_channel; co_begin < slice.end_out_channel;) {
      const index_t co_end = cuda_elements::staged_chunk_end(slice, co_begin, out_channels_per_chunk);
      __syncthreads();  // every thread is done reading the previous chunk
      const index_t count = cuda_elements::staged_taps<kChannels>(co_end - co_begin, taps_per_filter);
      for (index_t i = static_cast<index_t>(threadIdx.x); i < count; i += static_cast<index_t>(blockDim.x)) {
        cuda_elements::stage_filter_tap<kChannels>(i, staged, weight, co_begin, slice.first_channel, slice.channels,
                                                   in_per_group, taps_per_filter);
      }
      __syncthreads();  // the chunk is staged
      if (active) {
        cuda_elements::accumulate_fused<kChannels, index_t, scalar_t>(
            item, co_begin, co_end, routed,
            cuda_elements::staged_filter_slice<kChannels, index_t, scalar_t>(staged, co_begin, taps_per_filter),
            shape, conv, acc);
      }
      co_begin = co_end;
    }
    if (active) cuda_elements::store_fused<kChannels, index_t, scalar_t>(item, acc, output, shape);
  }
}

// The most blocks along a grid's y axis.
constexpr int64_t kMaxGridY = 65535;

at::Tensor unpool_relu_deconv2d_cuda(const at::Tensor& grad, const at::Tensor& switches, const at::Tensor& weight,
                                     at::IntArrayRef input_size, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation, at::IntArrayRef conv_stride,
                                     at::IntArrayRef conv_padding, at::IntArrayRef conv_dilation, int64_t groups,
                                     at::IntArrayRef output_size, c10::string_view rule,
                                     const std::optional<at::Tensor>& positive) {
  const checks::FusedGeometry fused =
      checks::check_unpool_relu_deconv2d(grad, switches, weight, input_size, kernel_size, stride, padding, dilation,
                                         conv_stride, conv_padding, conv_dilation, groups, output_size, rule, positive);
  at::cuda::CUDAGuard device_guard(grad.device());

  const int64_t batch = grad.size(0);
  const int64_t in_channels = weight.size(1) * groups;
  const int64_t taps_per_filter = weight.size(2) * weight.size(3);
  at::Tensor output = at::empty({batch, in_channels, output_size[0], output_size[1]}, grad.options());
  if (output.numel() == 0) {
    return output;
  }
  if (grad.numel() == 0 || weight.numel() == 0) {
    // No pooled values (or an empty filter): the transposed conv of zeros.
    return output.zero_();
  }
  // 32-bit indices where every tensor allows them, decided here once for both passes.
  const bool index32 = cuda_elements::fused_fits_int32(grad.numel(), weight.numel(), output.numel(), input_size[0],
                                                       input_size[1], fused.conv);
  const bool overlapping = geometry::windows_overlap(fused.pool.kernel_h, fused.pool.stride_h, fused.pool.dilation_h) ||
                           geometry::windows_overlap(fused.pool.kernel_w, fused.pool.stride_w, fused.pool.dilation_w);

  const at::Tensor grad_nchw = grad.contiguous();
  const at::Tensor switches_nchw = switches.contiguous();
  const at::Tensor weight_oihw = weight.contiguous();
  const checks::Mask mask(positive);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "unpool_relu_deconv2d_cuda", [&] {
    with_index_type(index32, [&](auto index_type) {
      using index_t = decltype(index_type);
      using Entry = Routed<at::opmath_type<scalar_t>, index_t>;
      const at::Tensor routed_bytes =
          at::empty({grad.numel() * static_cast<int64_t>(sizeof(Entry))}, grad.options().dtype(at::kByte));
      Entry* routed = reinterpret_cast<Entry*>(routed_bytes.mutable_data_ptr<uint8_t>());
      rules::dispatch_rule(fused.rule, mask.present(), [&](auto rule_type) {
        const auto kernel = route_kernel<decltype(rule_type), index_t, scalar_t>;
        const int64_t total = grad.numel();
        kernel<<<blocks_for(kernel, total), kThreadsPerBlock, 0, stream>>>(
            total, grad_nchw.const_data_ptr<scalar_t>(), mask.data(), switches_nchw.const_data_ptr<uint8_t>(), routed,
            input_size[0], input_size[1], grad.size(2), grad.size(3), fused.pool, fused.conv, overlapping);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });

      // channels per thread and where the taps are read from, by the staged kernels' own occupancy
      const cuda_elements::FusedLaunch plan = cuda_elements::choose_fused_launch(
          batch, groups, weight.size(1), weight.size(0), taps_per_filter, weight.element_size(), output_size[0],
          output_size[1], index32, [&](int64_t channels, int64_t shared_bytes) {
            int64_t blocks = 0;
            cuda_elements::with_channels_per_thread(channels, [&](auto tile) {
              blocks = blocks_per_multiprocessor(unpool_relu_deconv2d_staged_kernel<decltype(tile)::value, scalar_t>,
                                                 static_cast<size_t>(shared_bytes));
            });
            return int64_t(multiprocessor_count()) * blocks * kThreadsPerBlock;
          });
      const FusedShape shape =
          FusedShape::of(weight.size(0), weight.size(1), groups, grad.size(2), grad.size(3), input_size[0],
                         input_size[1], output_size[0], output_size[1], plan.channels_per_thread);
      if (plan.out_channels_per_chunk == 0) {
        const auto kernel = unpool_relu_deconv2d_kernel<index_t, scalar_t>;
        const int64_t total = shape.work_items(batch);
        kernel<<<blocks_for(kernel, total), kThreadsPerBlock, 0, stream>>>(
            total, routed, weight_oihw.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), shape,
            fused.pool, fused.conv);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      if constexpr (std::is_same<index_t, int32_t>::value) {  // choose_fused_launch stages 32-bit calls only
        cuda_elements::with_channels_per_thread(plan.channels_per_thread, [&](auto tile) {
          constexpr int kChannels = decltype(tile)::value;
          const int64_t item_blocks = geometry::ceil_div(batch * shape.out_h * shape.out_w, kThreadsPerBlock);
          const dim3 grid(static_cast<unsigned>(groups * shape.channel_tiles),
                          static_cast<unsigned>(std::min(item_blocks, kMaxGridY)));
          const size_t shared_bytes = static_cast<size_t>(cuda_elements::staged_bytes(
              plan.out_channels_per_chunk, kChannels, taps_per_filter, weight.element_size()));
          unpool_relu_deconv2d_staged_kernel<kChannels, scalar_t><<<grid, kThreadsPerBlock, shared_bytes, stream>>>(
              batch, routed, weight_oihw.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), shape,
              fused.pool, fused.conv, static_cast<int32_t>(plan.out_channels_per_chunk));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      }
    });
  });
  return output;
}

}  // namespace
}  // namespace deconvcuda

TORCH_LIBRARY_IMPL(deconvcuda, CUDA, m) {
  m.impl("max_pool2d_switches", TORCH_FN(deconvcuda::max_pool2d_switches_cuda));
  m.impl("unpool_relu", TORCH_FN(deconvcuda::unpool_relu_cuda));
  m.impl("deconv2d", TORCH_FN(deconvcuda::checks::deconv2d));
  m.impl("unpool_relu_deconv2d", TORCH_FN(deconvcuda::unpool_relu_deconv2d_cuda));
}
